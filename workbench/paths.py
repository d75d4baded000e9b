"""Where the project's own files are (importing this loads nothing heavy: the CLI parser needs it)."""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = PROJECT_ROOT / "data" / "models" / "llama-bytes"
