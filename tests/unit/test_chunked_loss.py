"""The trainer's loss on bf16 logits: chunked over tokens, the same value and gradients, no whole-vocabulary fp32."""

import torch
import torch.nn.functional as F

from stalwart.parallel.loss import chunked_cross_entropy, cross_entropy_loss

VOCAB = 53


def bf16_logits(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(tokens, VOCAB, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, VOCAB, (tokens,), generator=g)
    return logits, labels


def saved_fp32_elements(compute) -> int:  # noqa: ANN001 (a function of no arguments returning the loss)
    """The largest fp32 tensor autograd keeps for backward while ``compute`` runs."""
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        if t.dtype == torch.float32:
            largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compute()
    loss.backward()
    return largest


def test_chunks_give_the_whole_vocabulary_loss_and_gradients():
    logits, labels = bf16_logits(37)  # 10 tokens a chunk: the last one is short
    labels[[3, 20]] = -100  # ignored positions are left out of the mean, as F.cross_entropy does
    ours = logits.clone().requires_grad_()
    theirs = logits.clone().requires_grad_()
    loss = chunked_cross_entropy(ours, labels, chunk_elements=10 * VOCAB)
    expected = F.cross_entropy(theirs.float(), labels)
    loss.backward()
    expected.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert ours.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours.grad, theirs.grad)
    assert ours.grad[3].abs().max() == 0


def test_trainer_loss_takes_the_chunked_path_for_bf16_only():
    logits, labels = bf16_logits(64)
    batch = logits.view(2, 32, VOCAB), labels.view(2, 32)
    torch.testing.assert_close(cross_entropy_loss(*batch), F.cross_entropy(logits.float(), labels))
    # fp32 logits (the CPU default) keep the one-call loss the parity tests were written against.
    fp32 = logits.float().view(2, 32, VOCAB).requires_grad_()
    assert saved_fp32_elements(lambda: cross_entropy_loss(fp32, batch[1])) == 64 * VOCAB


def test_no_fp32_copy_of_the_whole_logits_is_kept_for_backward():
    logits, labels = bf16_logits(256)
    whole = 256 * VOCAB
    upcast = saved_fp32_elements(lambda: F.cross_entropy(logits.clone().requires_grad_().float(), labels))
    assert upcast >= whole  # what the trainer's loss avoids: log-softmax of every logit in fp32
    chunk = 16 * VOCAB
    kept = saved_fp32_elements(
        lambda: chunked_cross_entropy(logits.clone().requires_grad_(), labels, chunk_elements=chunk)
    )
    assert kept <= chunk
