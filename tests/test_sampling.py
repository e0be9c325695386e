import pytest
import torch
from diffusers import EulerDiscreteScheduler

from perco.models.unet_adapter import widen_conv_in
from perco.sampling import sample
from perco.testing import SD21_SCHEDULER, tiny_components


@pytest.fixture(scope="module")
def parts():
    c = tiny_components()
    widen_conv_in(c["unet"], 8)
    c["unet"].eval()
    g = torch.Generator().manual_seed(0)
    cond = {
        "spatial": torch.randn(2, 8, 8, 8, generator=g),
        "text": torch.randn(2, 77, 32, generator=g),
        "null_text": torch.randn(2, 77, 32, generator=g),
    }
    return c["unet"], c["scheduler"], cond


class CallRecorder:
    """Records every U-Net call's batch size and inputs."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append([a.clone() for a in args if torch.is_tensor(a)])

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("guidance,branches", [("none", 1), ("text", 2), ("text+spatial", 2)])
def test_one_unet_call_per_step(parts, guidance, branches):
    unet, scheduler, cond = parts
    rec = CallRecorder(unet)
    try:
        sample(unet, scheduler, **cond, steps=4, guidance=guidance, generator=torch.Generator())
    finally:
        rec.remove()
    assert len(rec.calls) == 4
    x, t, context = rec.calls[0]
    assert x.shape[0] == 2 * branches
    spatial = x[:, 4:]
    if guidance == "text":  # unconditional branch: same z_l, null text
        torch.testing.assert_close(spatial[:2], cond["spatial"])
        torch.testing.assert_close(context[:2], cond["null_text"])
        torch.testing.assert_close(context[2:], cond["text"])
    elif guidance == "text+spatial":  # unconditional branch: zero z_l and null text
        assert torch.all(spatial[:2] == 0)
        torch.testing.assert_close(context[:2], cond["null_text"])
    else:
        torch.testing.assert_close(context, cond["text"])


def test_guidance_scale_one_equals_the_conditional_branch(parts):
    unet, scheduler, cond = parts
    run = lambda mode, scale: sample(  # noqa: E731
        unet,
        scheduler,
        **cond,
        steps=3,
        guidance=mode,
        guidance_scale=scale,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(run("text", 1.0), run("none", 1.0), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(run("text", 3.0), run("none", 1.0), atol=1e-3)


def test_seeded_sampling_is_reproducible_and_per_sample(parts):
    unet, scheduler, cond = parts
    gens = lambda: [torch.Generator().manual_seed(7) for _ in range(2)]  # noqa: E731
    a = sample(unet, scheduler, **cond, steps=3, generator=gens())
    b = sample(unet, scheduler, **cond, steps=3, generator=gens())
    assert torch.equal(a, b)
    # sample 0 alone equals sample 0 in the batch: its noise comes from its own generator
    single = {k: v[:1] for k, v in cond.items()}
    alone = sample(unet, scheduler, **single, steps=3, generator=gens()[:1])
    torch.testing.assert_close(alone[0], a[0], atol=1e-5, rtol=1e-4)


def test_a_given_starting_noise_is_the_one_a_generator_would_draw(parts):
    """sample(noise=...): a student's paired-distillation target starts from the student's
    own noise, and is then exactly the teacher's decode of that noise."""
    unet, scheduler, cond = parts
    drawn = sample(unet, scheduler, **cond, steps=3, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(drawn.shape, generator=torch.Generator().manual_seed(7))
    given = sample(unet, scheduler, **cond, steps=3, noise=noise)
    torch.testing.assert_close(given, drawn, atol=1e-6, rtol=1e-5)
    other = sample(unet, scheduler, **cond, steps=3, noise=torch.randn(drawn.shape))
    assert not torch.allclose(other, drawn)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_any_scheduler_and_prediction_type(parts, prediction_type):
    unet, _, cond = parts
    cfg = {k: v for k, v in SD21_SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")}
    scheduler = EulerDiscreteScheduler(**{**cfg, "prediction_type": prediction_type})
    before = scheduler.timesteps.clone()
    out = sample(unet, scheduler, **cond, steps=3, guidance="none",
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(scheduler.timesteps, before)  # the caller's scheduler is not mutated

    # the same as diffusers' plain sampling loop with this scheduler, step by step
    reference = type(scheduler).from_config(scheduler.config)
    reference.set_timesteps(3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * reference.init_noise_sigma
    for t in reference.timesteps:
        model_in = torch.cat([reference.scale_model_input(x, t), cond["spatial"]], dim=1)
        pred = unet(model_in, t, cond["text"]).sample
        x = reference.step(pred, t, x).prev_sample
    torch.testing.assert_close(out, x)


def test_rejects_unknown_guidance(parts):
    unet, scheduler, cond = parts
    with pytest.raises(ValueError, match="guidance"):
        sample(unet, scheduler, **cond, steps=1, guidance="spatial")


def test_one_step_is_one_unbatched_call_whose_x0_the_prediction_implies(parts):
    from perco.losses import predicted_x0
    from perco.sampling import one_step

    unet, scheduler, cond = parts
    rec = CallRecorder(unet)
    try:
        gen = [torch.Generator().manual_seed(s) for s in (3, 4)]
        x0 = one_step(unet, scheduler, cond["spatial"], cond["text"], timestep=999, generator=gen)
    finally:
        rec.remove()
    (x, t, context), = rec.calls  # fmt: skip
    assert x.shape[0] == 2 and torch.equal(t, torch.tensor([999, 999]))
    torch.testing.assert_close(context, cond["text"])  # the conditional branch alone
    noise = torch.randn(x[:1, :4].shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x[:1, :4], noise)  # seeded per image, as sample() draws
    pred = unet(x, t, context).sample
    torch.testing.assert_close(x0, predicted_x0(scheduler, x[:, :4], pred, t))


def test_a_student_decodes_its_teachers_files_in_one_unet_call(tmp_path):
    """The same bytes: a teacher's files decode with its one-step student, one U-Net call
    per batch, deterministic per file seed; the student's own files are the teacher's."""
    from perco import codec
    from perco.models.perco import PerCo
    from perco.models.student import one_step_student
    from perco.testing import tiny_perco

    teacher = tiny_perco("r0.0019").eval()
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    files = [data for data, _ in codec.compress(teacher, images, ["a cat", "a dog"], seed=5)]
    one_step_student(teacher, timestep=901).save_pretrained(tmp_path / "student")
    student = PerCo.from_pretrained(tmp_path / "student").eval()
    assert student.config.sampler == "one-step" and student.default_steps == 1
    assert student.fingerprint != teacher.fingerprint
    assert codec.file_fingerprint(student) == teacher.fingerprint

    parsed = [codec.parse(student, data)[0] for data in files]
    rec = CallRecorder(student.unet)
    try:
        first = codec.decompress(student, parsed)
        alone = codec.decompress(student, parsed[1:], batch_size=1)
    finally:
        rec.remove()
    assert [c[0].shape[0] for c in rec.calls] == [2, 1]  # one call, no guidance branch
    assert all(torch.equal(c[1], torch.full_like(c[1], 901)) for c in rec.calls)
    torch.testing.assert_close(first[1], alone[0], atol=1e-5, rtol=0)  # float rounding only
    assert first[0].shape == (3, 64, 96)
    again, _ = codec.compress(student, images[:1], ["a cat"], seed=5)[0]
    assert again == files[0]  # the student writes the teacher's bytes
    with pytest.raises(ValueError, match="one-step student"):
        student.decode(student.encode(images[:1], ["a cat"]), steps=5)
