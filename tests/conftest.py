import os

import pytest

# Tests run single-threaded-friendly on small CPUs; keep torch from oversubscribing the cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def smollm2():
    """The bundled default model (SmolLM2-135M-Instruct), converted once into the cache."""
    from align_decode.models import load_model

    try:
        return load_model()
    except FileNotFoundError as e:
        pytest.skip(f"default model unavailable: {e}")
