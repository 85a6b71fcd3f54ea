"""Where sums live and whether activations are checkpointed: same bytes every way, and
the auto choices follow the free memory."""

from pathlib import Path

import pytest
import torch
from checkpoints import char_tokenizer, save
from helpers import interrupted_at_pass
from tiny_models import AS_CHECKPOINT, make_tiny_model

from mergekit_lrp.scoring.gradient_sums import GradientAccumulator
from mergekit_lrp.scoring.options import ComputeError, ComputeOptions
from mergekit_lrp.scoring.placement import activation_bytes, plan
from mergekit_lrp.scoring.run import compute_scores

GiB = 2**30


@pytest.fixture(scope="module")
def model_and_prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i}: the cat sat" for i in range(5)) + "\n")
    return save(make_tiny_model("llama", seed=4, **AS_CHECKPOINT), root / "model"), prompts


def score(model_and_prompts, out: Path, **options) -> bytes:
    model, prompts = model_and_prompts
    options = ComputeOptions(progress=False, checkpoint_every=2, **options)
    compute_scores(str(model), str(prompts), str(out), options)
    return out.read_bytes()


def test_every_placement_and_checkpointing_writes_the_same_bytes(model_and_prompts, tmp_path):
    files = {
        (where, checkpointing): score(
            model_and_prompts,
            tmp_path / f"{where}-{checkpointing}.safetensors",
            accumulate_on=where,
            gradient_checkpointing=checkpointing,
        )
        for where in ("device", "cpu", "auto")
        for checkpointing in (True, False, "auto")
    }
    assert len(set(files.values())) == 1


def test_a_resume_file_of_one_placement_continues_under_the_other(model_and_prompts, tmp_path):
    reference = score(model_and_prompts, tmp_path / "reference.safetensors")
    out = tmp_path / "scores.safetensors"
    with interrupted_at_pass(3):
        score(model_and_prompts, out, accumulate_on="device", gradient_checkpointing=True)
    assert score(model_and_prompts, out, accumulate_on="cpu", resume=True) == reference


def test_sums_live_beside_their_parameters_when_asked():
    model = make_tiny_model("llama", seed=0, **AS_CHECKPOINT)
    on_device = GradientAccumulator(dict(model.named_parameters()), on_device=True)
    assert all(
        on_device.sums[name].device == p.device for name, p in model.named_parameters()
    )


class FakeDevice:
    """Pretend the parameters live on a GPU with ``free`` bytes free."""

    def __init__(self, free: int):
        self.free = free

    def __call__(self, device):
        return self.free if device.type == "cuda" else 64 * GiB


def on_gpu(model):
    meta = torch.device("cuda", 0)
    return {name: _Located(p, meta) for name, p in model.named_parameters()}


class _Located:
    def __init__(self, parameter, device):
        self.device, self._numel = device, parameter.numel()

    def numel(self):
        return self._numel


def test_auto_puts_sums_on_the_device_only_when_they_fit():
    model = make_tiny_model("llama", seed=0, **AS_CHECKPOINT)
    params = on_gpu(model)
    need = 4 * sum(p.numel() for p in params.values())
    roomy = plan(ComputeOptions(), model, params, torch.float32, free=FakeDevice(100 * need))
    tight = plan(ComputeOptions(), model, params, torch.float32, free=FakeDevice(need // 2))
    assert roomy.sums_on_device and not tight.sums_on_device
    assert "sums on the host" in " ".join(tight.notes)


def test_device_sums_that_do_not_fit_are_refused_before_scoring():
    model = make_tiny_model("llama", seed=0, **AS_CHECKPOINT)
    params = on_gpu(model)
    options = ComputeOptions(accumulate_on="device")
    with pytest.raises(ComputeError, match=r"needs .* GiB .* has .* GiB free"):
        plan(options, model, params, torch.float32, free=FakeDevice(1000))


def test_auto_checkpoints_only_when_activations_do_not_fit():
    model = make_tiny_model("llama", seed=0, **AS_CHECKPOINT)
    params = dict(model.named_parameters())
    options = ComputeOptions(max_length=512)
    activations = activation_bytes(model.config, 512, torch.float32)
    fits = plan(options, model, params, torch.float32, free=lambda d: 10 * activations)
    short = plan(options, model, params, torch.float32, free=lambda d: activations)
    assert not fits.checkpointing and short.checkpointing
    assert "gradient-checkpointing auto: on" in " ".join(short.notes)
    explicit = plan(
        ComputeOptions(gradient_checkpointing=True), model, params, torch.float32,
        free=lambda d: 10 * activations,
    )  # fmt: skip
    assert explicit.checkpointing
    forward_only = plan(
        ComputeOptions(method="activation"), model, params, torch.float32,
        free=lambda d: activations,
    )  # fmt: skip
    assert not forward_only.checkpointing and not forward_only.notes  # nothing to checkpoint


@pytest.mark.parametrize("free_memory", [1, None])  # nothing free: on; plenty: off
def test_the_python_api_decides_auto_checkpointing_as_the_cli_does(monkeypatch, free_memory):
    from mergekit_lrp import compute_scores as api_compute_scores
    from mergekit_lrp.scoring import loop, placement

    if free_memory is not None:
        monkeypatch.setattr(placement, "free_bytes", lambda device: free_memory)
    used = []
    real = loop.backward_ready

    def spy(net, checkpointing=True, **options):
        used.append(checkpointing)
        return real(net, checkpointing, **options)

    monkeypatch.setattr(loop, "backward_ready", spy)
    model = make_tiny_model("llama", seed=0, **AS_CHECKPOINT)
    api_compute_scores(model, char_tokenizer(), ["the cat sat"])
    assert used == [free_memory is not None]


@pytest.mark.parametrize("method", ["attnlrp", "fisher"])  # |grad| and grad² sums
def test_overlapped_host_sums_write_the_same_bytes_and_resume(
    model_and_prompts, tmp_path, monkeypatch, method
):
    """The background adder (forced on, as on a GPU) gives the synchronous bytes, also
    through resume checkpoints written mid-run (which must wait for pending additions)."""
    import functools
    import time

    from mergekit_lrp.scoring import gradient_sums
    from mergekit_lrp.scoring.host_adder import HostAdder

    reference = score(model_and_prompts, tmp_path / "sync.safetensors", method=method)
    forced = functools.partial(GradientAccumulator, overlap=True)
    monkeypatch.setattr(gradient_sums, "GradientAccumulator", forced)
    add = HostAdder._add

    def slow_add(*args):  # a host that lags, so additions are pending at every read
        time.sleep(0.002)
        add(*args)

    monkeypatch.setattr(HostAdder, "_add", staticmethod(slow_add))
    overlapped = score(model_and_prompts, tmp_path / "overlap.safetensors", method=method)
    assert overlapped == reference

    out = tmp_path / "resumed.safetensors"
    with interrupted_at_pass(4):  # after the checkpoint at 2 prompts and one more pending
        score(model_and_prompts, out, method=method)
    assert score(model_and_prompts, out, method=method, resume=True) == reference


def test_host_adder_keeps_order_with_one_buffer_and_reports_a_failed_addition():
    from mergekit_lrp.scoring.host_adder import HostAdder

    adder = HostAdder(largest_bytes=4 * 6, pin=False, slots=1)  # every submit waits
    total = torch.zeros(2, 3)
    grads = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    for grad in grads:
        adder.submit(total, grad, square=True)
    adder.drain()
    expected = torch.zeros(2, 3)
    for grad in grads:
        expected.add_(grad.square())
    assert torch.equal(total, expected)

    adder.submit(torch.zeros(3, 2), grads[0], square=False)  # shapes do not broadcast
    with pytest.raises(RuntimeError, match="host sums failed"):
        adder.drain()
    adder._error = None
    adder.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_overlapped_host_sums_match_device_sums_on_cuda(model_and_prompts, tmp_path):
    on_device = score(model_and_prompts, tmp_path / "d.safetensors", device="cuda",
                      accumulate_on="device")  # fmt: skip
    on_host = score(model_and_prompts, tmp_path / "h.safetensors", device="cuda",
                    accumulate_on="cpu")  # fmt: skip
    assert on_host == on_device
