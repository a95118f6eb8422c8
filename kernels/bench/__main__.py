from kernels.bench.kernels import main

main()
