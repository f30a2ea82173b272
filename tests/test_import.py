"""`import musicssl` stays cheap: no Hub client, no audio backend, no model family until used."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_lazy():
    code = (
        "import sys, musicssl; heavy = [m for m in ('huggingface_hub', 'soundfile', 'soxr', 'safetensors', "
        "'musicssl.models.spec_vit', 'musicssl.hub', 'musicssl.audio.io') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api():
    import musicssl

    for name in ("load", "list_models", "model_info", "Embeddings", "save_pretrained", "__version__"):
        assert hasattr(musicssl, name)
    assert musicssl.__version__ == "0.1.0.dev0"
