"""``loss="lm"``: next-token cross-entropy for causal language models, and the warning
when ``"ce"`` is given the input ids as targets.

Before: only ``"ce"`` existed; given a causal LM's probe with targets = input ids (what
Hugging Face's ``labels`` are), it scored every position against its own token, a
copying loss, and G and K were the gradients of a loss the model was never trained on,
with nothing said."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import assert_close_report, per_sample_capture, per_sample_loss, readings
from torch import nn

from ddsmon import compute_signatures, losses
from ddsmon.errors import ProbeError
from ddsmon.losses import per_sample_loss_fn

TOL = 1e-10


class TinyLM(nn.Module):
    """Token embedding, one causal mixing step (each position sees the one before),
    a vocabulary head: logits (n, T, V)."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        before = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return self.head(torch.tanh(self.mix(torch.cat([h, before], dim=-1))))


def _probe(n: int = 7, t: int = 5, vocab: int = 11) -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randint(0, vocab, (n, t))


def test_lm_is_the_next_token_loss_of_the_reference_loop() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 9, dtype=torch.float64)
    ids = torch.randint(0, 9, (4, 6))
    ids[1, 3] = -100  # a padded position: not scored
    got = per_sample_loss_fn("lm")(logits, ids)
    want = per_sample_loss(logits, ids, "lm")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert not torch.allclose(got, per_sample_loss_fn("ce")(logits, ids.clamp_min(0)))


def test_lm_readings_equal_the_per_sample_loop() -> None:
    model, ids = TinyLM().eval(), _probe()
    sig = compute_signatures(model, ids, ids, loss="lm", device="cpu")
    refs = per_sample_capture(model, ids, ids, "lm", list(sig.layers))
    for name, cap in refs.items():
        want, got = readings(cap), sig.layers[name]
        g = want["g_spectrum"]
        assert_close_report(got.g_spectrum, g[: len(got.g_spectrum)], atol=TOL * g[0], what=name)
        k = want["param_spectrum"]
        assert_close_report(got.param_spectrum[: len(k)], k, atol=TOL * k[0], what=f"{name} K")
    copying = compute_signatures(model, ids, ids, loss="ce", device="cpu")
    assert not np.allclose(copying.layers["head"].g_spectrum, sig.layers["head"].g_spectrum)


def test_ce_with_the_input_ids_as_targets_is_said_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(losses, "_SAID_COPYING", False)
    model, ids = TinyLM().eval(), _probe()
    with caplog.at_level("WARNING", logger="ddsmon"):
        compute_signatures(model, {"ids": ids}, ids, loss="ce", device="cpu", fisher="activation")
        compute_signatures(model, ids, ids, loss="ce", device="cpu", fisher="activation")
        compute_signatures(model, ids, ids, loss="lm", device="cpu", fisher="activation")
    said = [r.getMessage() for r in caplog.records if "own token" in r.getMessage()]
    assert len(said) == 1 and "--loss lm" in said[0], caplog.text
    caplog.clear()
    monkeypatch.setattr(losses, "_SAID_COPYING", False)
    shifted = torch.roll(ids, -1, dims=1)
    with caplog.at_level("WARNING", logger="ddsmon"):
        compute_signatures(model, ids, shifted, loss="ce", device="cpu", fisher="activation")
    assert "own token" not in caplog.text


def test_lm_and_ce_name_targets_outside_the_vocabulary() -> None:
    """Before: ``IndexError: Target 13 is out of bounds.``, naming neither the loss nor
    the targets."""
    model, ids = TinyLM().eval(), _probe()
    bad = ids.clone()
    bad[2, 4] = 13
    for loss in ("lm", "ce"):
        with pytest.raises(
            ProbeError,
            match=rf"loss '{loss}': the targets hold 13 at \(2, 4\), but the logits have 11 classes",
        ):
            compute_signatures(model, ids, bad, loss=loss, device="cpu")
    flat = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ProbeError, match=r"the targets hold 7 at \(1,\), but the logits have 4"):
        compute_signatures(
            flat, torch.randn(3, 3), torch.tensor([0, 7, 1]), loss="ce", device="cpu"
        )


def test_lm_needs_sequences() -> None:
    with pytest.raises(ProbeError, match=r"loss 'lm' needs logits of shape \(n, T, C\)"):
        compute_signatures(nn.Linear(3, 4), torch.randn(5, 3), torch.zeros(5), loss="lm")
    with pytest.raises(ProbeError, match="at least 2 positions"):
        per_sample_loss_fn("lm")(torch.randn(2, 1, 4), torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.slow
def test_lm_is_hugging_faces_causal_lm_loss() -> None:
    """The per-sample 'lm' loss of a sample equals the loss GPT2LMHeadModel computes
    from labels = input_ids for that sample alone (HF's convention is the oracle)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=17, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    torch.manual_seed(2)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 17, (3, 6))
    ids_labels = ids.clone()
    ids_labels[0, 5] = -100
    with torch.no_grad():
        ours = per_sample_loss_fn("lm")(model(input_ids=ids).logits, ids_labels)
        theirs = [
            model(input_ids=ids[i : i + 1], labels=ids_labels[i : i + 1]).loss for i in range(3)
        ]
    # HF's ForCausalLMLoss casts the logits to float32 first: agreement to float32's
    torch.testing.assert_close(ours, torch.stack(theirs).double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("loss", "blank"),
    [("lm", (slice(None), slice(1, None))), ("ce", (slice(None), slice(None)))],
)
def test_targets_that_score_no_position_are_a_probe_error(loss: str, blank: tuple) -> None:
    """Every target -100 (with 'lm', every one after each sample's first): no position is
    scored, every loss is 0 and every gradient zero. Before, G and K were recorded as
    readings (g_rank 0, spectra of zeros) as if measured."""
    model, ids = TinyLM().eval(), _probe()
    targets = ids.clone()
    targets[blank] = -100
    with pytest.raises(ProbeError, match=r"-100.*no position is scored"):
        compute_signatures(model, ids, targets, loss=loss, device="cpu")
    sig = compute_signatures(model, ids, targets, loss=loss, device="cpu", fisher="none")
    assert sig.layers  # activation readings need no scored position
    targets[0, -1] = ids[0, -1]  # one scored position: read
    compute_signatures(model, ids, targets, loss=loss, device="cpu")


def test_ce_with_a_seq2seq_models_labels_as_targets_is_not_said(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A T5 probe ``{"input_ids", "labels"}`` with targets = its labels (what the README
    asks of encoder-decoder models): T5's logits at position t predict ``labels[t]``, so
    ``"ce"`` is right. Before, the targets were compared with every input, ``labels``
    included, and ddsmon advised ``--loss lm`` (which would shift them wrongly). Targets
    equal to the encoder's ``input_ids`` are still said."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=16, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 16, (6, 5), generator=generator)
    labels = torch.randint(2, 16, (6, 4), generator=generator)
    layers = [r"lm_head"]
    monkeypatch.setattr(losses, "_SAID_COPYING", False)
    with caplog.at_level("WARNING", logger="ddsmon"):
        for probe in (
            {"input_ids": ids, "labels": labels},
            {"input_ids": ids, "decoder_input_ids": labels},
        ):
            sig = compute_signatures(model, probe, labels, loss="ce", layers=layers,
                                     device="cpu", fisher="activation")  # fmt: skip
            assert sig.layers, "the decoder's head was read"
    assert "own token" not in caplog.text, caplog.text
    same = torch.randint(2, 16, (6, 5), generator=generator)
    with caplog.at_level("WARNING", logger="ddsmon"):
        compute_signatures(model, {"input_ids": same, "labels": same}, same, loss="ce",
                           layers=layers, device="cpu", fisher="activation")  # fmt: skip
    assert "own token" in caplog.text and "--loss lm" in caplog.text, caplog.text
