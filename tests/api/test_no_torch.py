from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_api_never_imports_torch_or_the_model(tmp_path: Path) -> None:
    """The API image ships without torch: building the app and serving a request must not need it."""
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from api.main import create_app\n"
        "from core.settings import load_settings\n"
        f"app = create_app(load_settings(redis_url='redis://127.0.0.1:1/0', data_dir={str(tmp_path)!r}))\n"
        "with TestClient(app) as c:\n"
        "    assert c.get('/healthz').status_code == 200\n"
        "    assert c.post('/v1/txt2img', json={'prompt': 'a', 'width': 513}).status_code == 422\n"
        "    assert c.get('/openapi.json').status_code == 200\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'model', 'worker', 'diffusers',"
        " 'transformers', 'numpy'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
