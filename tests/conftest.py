import os

# Triton kernels run on CPU tensors through Triton's interpreter in the tests. Triton reads this
# when triton.language is first imported (torch._dynamo imports it), so it is set before torch.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# No autotuning unless a test asks for it (heuristic configs keep the suite fast); tuned entries
# never go to the user's cache file.
os.environ.setdefault("ATTNCOMP_AUTOTUNE", "0")
os.environ.setdefault("ATTNCOMP_AUTOTUNE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache",
                                                              "attncomp-autotune.json"))
os.environ.setdefault("ATTNCOMP_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache",
                                                         "attncomp-kernels"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
