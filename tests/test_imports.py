"""Commands import only what they need: evaluating precomputed features loads no model, image or word library."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "gensim", "scipy", "sru")


@pytest.mark.slow
def test_features_evaluation_imports_no_heavy_library(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", images=rng.standard_normal((20, 8), dtype=np.float32),
             captions=rng.standard_normal((100, 8), dtype=np.float32))
    program = ("import json, sys; import eval_retrieval; "
               f"eval_retrieval.main(['--features', {str(tmp_path / 'f.npz')!r}, '--protocols', 'full']); "
               f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "rsum" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
