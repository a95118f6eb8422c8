"""A GGUF checkpoint's tokenizer: the ``tokenizers`` tokenizer that transformers builds from the file's
metadata (``AutoTokenizer`` with ``gguf_file``), so its ids are transformers' by construction.

Importing transformers imports torch whenever torch is installed, and the gateway process must import
neither (it runs no model). So a process that has not imported transformers converts in a child
interpreter (``python -m gpu_worker.gguf_tokenizer FILE`` prints the tokenizer as JSON) and loads the JSON
with ``tokenizers`` alone; one that has (the offline engine, the demo-model writer) converts in place.
The conversion takes seconds either way; a directory holding the GGUF file and a ``tokenizer.json``
skips it (scheduler_svc.gateway.tokenizer).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer

# The directory holding the gpu_worker package, for the child's import path (a checkout's root, or
# site-packages when installed).
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer transformers builds from the file's metadata, converted in this process."""
    from transformers import AutoTokenizer

    path = Path(path).resolve()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).backend_tokenizer


def load_gguf_tokenizer(path: str | Path, timeout_s: float = 600.0) -> Tokenizer:
    """``gguf_tokenizer``, converted in a child interpreter unless transformers is loaded here already."""
    if "transformers" in sys.modules:
        return gguf_tokenizer(path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_PACKAGE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, "-m", "gpu_worker.gguf_tokenizer", str(path)], capture_output=True,
                         text=True, env=env, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"{path}: converting the GGUF tokenizer failed: {out.stderr.strip()[-2000:]}")
    return Tokenizer.from_str(out.stdout)


def main(argv: list[str] | None = None) -> int:
    (path,) = sys.argv[1:] if argv is None else argv
    sys.stdout.write(gguf_tokenizer(path).to_str())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
