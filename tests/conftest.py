import pytest
import torch

# The tests' models are tiny: one thread is faster than several fighting over a small, shared CPU.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    """The bundled default model (SmolLM2-135M-Instruct), converted once into the cache."""
    from align_decode.models import load_model

    try:
        return load_model()
    except FileNotFoundError as e:
        pytest.skip(f"default model unavailable: {e}")
