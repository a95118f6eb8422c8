"""Which kind of checkpoint a --model path names. Standard library only: the gateway and the offline
API check the path without importing torch."""

import re
from dataclasses import dataclass
from pathlib import Path

ACCEPTS = ("--model takes a local checkpoint: a Hugging Face directory (config.json + safetensors), a .gguf file "
           "or a directory holding one; nothing is downloaded")


@dataclass(frozen=True)
class ModelFiles:
    """What a --model path holds: a Hugging Face directory (config.json, safetensors or .bin weights,
    tokenizer.json) or a GGUF checkpoint (one file holding config, tokenizer and weights)."""

    path: Path  # as given
    gguf_file: Path | None  # the GGUF file; None for a Hugging Face directory


def resolve_model(path: str | Path) -> ModelFiles:
    """Tell a Hugging Face directory (it has config.json) from a GGUF checkpoint: a .gguf file, or a
    directory without config.json holding exactly one .gguf file.

    Raises FileNotFoundError when the path holds neither, ValueError when it names a file that is not a
    .gguf or a directory with several .gguf files.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf checkpoint (give a .gguf file or a directory)")
        return ModelFiles(path, path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist{_hub_hint(path)}; {ACCEPTS}")
    if (path / "config.json").exists():
        return ModelFiles(path, None)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise ValueError(f"{path} holds several .gguf files ({', '.join(f.name for f in ggufs)}): name one")
    if not ggufs:
        raise FileNotFoundError(f"{path} has no config.json and no .gguf file; {ACCEPTS}")
    return ModelFiles(path, ggufs[0])


def _hub_hint(path: Path) -> str:
    """A missing 'owner/name' path whose 'owner' is no local directory either is most likely a Hugging Face
    Hub id: say how to get it."""
    text = str(path)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and not path.parent.exists():
        return (f" (it looks like a Hugging Face Hub id: download it first, e.g. `hf download {text} "
                f"--local-dir DIR`, and give DIR)")
    return ""
