import itertools

import pytest
import torch
import torch.nn.functional as F

from gpt2 import GPT, preset
from gpt2.distill import Distiller, distill_step, distillation_loss
from gpt2.train import TrainConfig, make_optimizer, train_step

CPU = torch.device("cpu")


def _random_logits(seed: int):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 5, 11, generator=g)
    teacher = 3 * torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, :2] = -100
    return student, teacher, targets


def test_loss_mixes_scaled_kl_and_cross_entropy():
    student, teacher, targets = _random_logits(0)
    T = 2.0
    scored = targets != -100
    p_teacher = (teacher[scored] / T).softmax(dim=-1)
    log_p_student = (student[scored] / T).log_softmax(dim=-1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(dim=-1).mean()  # per scored token
    ce = F.cross_entropy(student[scored], targets[scored])
    assert distillation_loss(student, teacher, targets, T, alpha=0.3).item() == pytest.approx(
        (0.3 * T**2 * kl + 0.7 * ce).item(), rel=1e-5
    )
    assert distillation_loss(student, teacher, targets, T, alpha=0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    assert distillation_loss(student, student, targets, T, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)
    # Positions with target -100 count in neither term.
    changed_student, changed_teacher = student.clone(), teacher.clone()
    changed_student[0, :2] += torch.randn(2, 11) * 5
    changed_teacher[0, :2] -= 7.0 * torch.arange(11.0)
    assert torch.equal(
        distillation_loss(changed_student, changed_teacher, targets, T, 0.5), distillation_loss(student, teacher, targets, T, 0.5)
    )


def test_t_squared_keeps_the_soft_gradient_size_independent_of_temperature():
    student, teacher, targets = _random_logits(1)
    norms = []
    for T in (20.0, 40.0):
        logits = student.clone().requires_grad_(True)
        distillation_loss(logits, teacher, targets, T, alpha=1.0).backward()
        norms.append(logits.grad.norm().item())
    # Without the T² factor the gradient would shrink 4× from T=20 to T=40.
    assert norms[1] == pytest.approx(norms[0], rel=0.05)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\], got -0.1"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
    ],
)
def test_bad_options_are_named(options, message):
    student, teacher, targets = _random_logits(2)
    with pytest.raises(ValueError, match=message):
        distillation_loss(student, teacher, targets, **options)
    with pytest.raises(ValueError, match=message):
        Distiller(GPT(preset("tiny")), GPT(preset("tiny")), **options)


def test_mismatched_shapes_are_named():
    student, teacher, targets = _random_logits(3)
    with pytest.raises(ValueError, match=r"teacher logits \(2, 5, 10\)"):
        distillation_loss(student, teacher[..., :10], targets)
    with pytest.raises(ValueError, match=r"targets \(2, 4\)"):
        distillation_loss(student, teacher, targets[:, :4])


def _batches(seed: int, n: int, batch: int = 4, length: int = 32):
    """Token batches over the first 512 ids, so a short run sees every token many times."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 512, (n, batch, length + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def _teacher() -> GPT:
    torch.manual_seed(1)
    teacher = GPT(preset("tiny")).eval()
    with torch.no_grad():
        teacher.transformer.ln_f.weight.mul_(40)  # confident, peaked predictions: something definite to learn
    return teacher


def _teacher_text(teacher: GPT, seed: int, n: int):
    """Batches whose targets are the teacher's own top predictions: text the teacher models well, as a trained
    teacher models its training data (random targets would pull the student's cross-entropy term elsewhere)."""
    batches = []
    for x, _ in _batches(seed, n):
        with torch.no_grad():
            batches.append((x, teacher(x)[0].argmax(dim=-1)))
    return batches


def _kl_to_teacher(student: GPT, teacher: GPT, batches) -> float:
    with torch.no_grad():
        return sum(
            distillation_loss(student(x)[0], teacher(x)[0], y, temperature=1.0, alpha=1.0).item() for x, y in batches
        ) / len(batches)


def test_distillation_moves_the_student_toward_the_teacher():
    teacher = _teacher()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(2)
    student = GPT(preset("tiny"))
    cfg = TrainConfig(max_lr=1e-2, min_lr=1e-2, warmup_steps=1, max_steps=100, weight_decay=0.0)
    optimizer = make_optimizer(student, cfg, "cpu")
    train, held_out = _teacher_text(teacher, 0, 4), _teacher_text(teacher, 1, 2)
    kl_before, held_out_kl_before = _kl_to_teacher(student, teacher, train), _kl_to_teacher(student, teacher, held_out)
    batches = itertools.cycle(train)
    losses = [
        distill_step(student, teacher, optimizer, batches, step, cfg, 1, device=CPU, temperature=2.0, alpha=0.5).loss
        for step in range(16)
    ]
    assert sum(losses[-4:]) / 4 < 0.85 * losses[0]  # about 18.4 → 13.3 here
    assert _kl_to_teacher(student, teacher, train) < 0.7 * kl_before  # about 9.5 → 5.6 nats per token
    assert _kl_to_teacher(student, teacher, held_out) < held_out_kl_before  # and closer on unseen text too
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())


def test_distiller_trains_only_the_student_and_alpha_zero_is_plain_training():
    teacher = _teacher()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(3)
    student = GPT(preset("tiny"))
    reference = GPT(preset("tiny"))
    reference.load_state_dict(student.state_dict())
    distiller = Distiller(student, teacher, alpha=0.0)
    distiller.train()
    assert student.training and not teacher.training
    cfg = TrainConfig(max_lr=1e-3, warmup_steps=1, max_steps=10)
    optimizer = make_optimizer(distiller, cfg, "cpu")
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in student.parameters()}
    # alpha=0 is the plain loss: the same loss and gradients as training the student alone (which computes its
    # loss chunk by chunk, so equal up to float rounding; comparing gradients rather than weights after AdamW,
    # which turns rounding noise in the keys' bias gradients, zero in exact arithmetic, into full-size steps).
    x, y = _batches(2, 1)[0]
    distiller(x, y)[1].backward()
    reference(x, y, return_logits=False)[1].backward()
    for (name, p), q in zip(student.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name
    assert all(p.grad is None for p in teacher.parameters())
    train_step(distiller, optimizer, iter(_batches(2, 2)), 0, cfg, 2, device=CPU)
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())
