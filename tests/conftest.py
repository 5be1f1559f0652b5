"""Shared fixtures. Real data comes from ../shared/data (or $GOLFNB_SHARED_DATA); it is never copied
into the repository. In CI (CI=true) a missing data folder is an error, not a skip."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, golfnb's Triton kernels run in Triton's interpreter on CPU tensors, so the CPU suite checks the
# same kernel source the GPU runs. The flag must be set before anything imports triton (torch._dynamo does):
# triton.language decides at import whether its own helpers are interpretable.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    env = os.environ.get("GOLFNB_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = _shared_dir()
    if not (d / "tokenizers" / "fineweb_1024_bpe.model").exists():
        msg = (f"real test data not found at {d}: tests read ../shared/data beside the checkout "
               f"(or set GOLFNB_SHARED_DATA)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def sp1024_model(shared_data: Path) -> Path:
    return shared_data / "tokenizers" / "fineweb_1024_bpe.model"


@pytest.fixture(scope="session")
def sp8192_model(shared_data: Path) -> Path:
    return shared_data / "tokenizers" / "fineweb_8192_bpe.model"


@pytest.fixture(scope="session")
def val_prefix_sp1024(shared_data: Path) -> Path:
    return shared_data / "challenge_val_prefix" / "fineweb_val_prefix_sp1024.bin"


@pytest.fixture(scope="session")
def val_prefix_sp8192(shared_data: Path) -> Path:
    return shared_data / "challenge_val_prefix" / "fineweb_val_prefix_sp8192_retokenized.bin"
