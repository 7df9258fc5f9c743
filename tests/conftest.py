"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on the shared 2-core machine one thread is far faster.
    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_sampling(monkeypatch):
    """sample.py must stop at its checks: any image generated fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started")
    monkeypatch.setattr("diffusion.pipeline.generate", refuse)


@pytest.fixture
def sample_refusal(capsys):
    """run(argv): sample.py's main must exit with status 2 and one line "sample.py: error: ..." on stderr (the
    hardening round's convention), which run returns."""
    import sample

    def run(argv: list[str]) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            sample.main(argv)
        message = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message.startswith("sample.py: error: ") and "\n" not in message, message
        return message
    return run
