"""One-off GPU measurements behind kernels/NOTES.md decisions, kept so their figures can be rerun:
``PYTHONPATH=$PWD python3 -m kernels.experiments.<name>`` on a CUDA machine."""
