"""Property-based tests (hypothesis): statements that must hold for every input of a kind, not just the examples in
the notebooks. A failure prints the smallest input hypothesis found that breaks the statement."""
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from vit_nb.backprop import NONFINITE, PRECISIONS
from vit_nb.config import TrainConfig
from vit_nb.data import DATASETS, TensorLoader
from vit_nb.loss import LOSSES, LossCalculator, focal_loss
from vit_nb.model import PRESETS
from vit_nb.optimizer import OPTIMIZERS, SCHEDULERS, OptimizerManager

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- TrainConfig round-trips -----------------------------------------------------------------------------------------
def fraction(hi=0.999): return st.floats(0, hi, allow_nan=False, exclude_max=True)
def positive(hi=1e6): return st.floats(1e-12, hi, allow_nan=False, allow_infinity=False)
def non_negative(hi=1e6): return st.floats(0, hi, allow_nan=False, allow_infinity=False)
def optional(s): return st.none() | s
text = st.text(max_size=20)

@st.composite
def loss_parts(draw):
    "A loss with options that apply to it (label smoothing is not an option of mse)."
    loss = draw(st.sampled_from(LOSSES))
    ls = 0. if loss == 'mse' else draw(fraction(0.9))
    opts = {}
    if loss == 'focal': opts = draw(st.fixed_dictionaries({}, optional=dict(gamma=non_negative(5.), alpha=optional(st.floats(0, 1)))))
    if loss == 'cross_entropy': opts = draw(st.sampled_from([{}, dict(weight='balanced')]))
    return dict(loss=loss, label_smoothing=ls, loss_opts=opts)

@st.composite
def configs(draw):
    "Any valid `TrainConfig`."
    valid_pct = draw(fraction(0.5)); test_pct = draw(fraction(0.45))
    patience = draw(optional(st.integers(1, 1000)))  # early stopping follows a metric the run has
    monitor = draw(text if patience is None else st.sampled_from(['train_loss'] + (['valid_loss', 'valid_acc'] if valid_pct else [])))
    model = draw(st.fixed_dictionaries({}, optional=dict(dropout=fraction(0.9), attn_dropout=fraction(0.9), drop_path=fraction(0.9),
                                                         depth=st.integers(1, 24), mlp_ratio=positive(8.))))
    kw = dict(data=draw(st.sampled_from(DATASETS)), root=draw(optional(text)), img_size=draw(optional(st.integers(1, 2**20))),
              valid_pct=valid_pct, test_pct=test_pct, num_workers=draw(st.integers(0, 64)), bs=draw(st.integers(1, 2**31)),
              seed=draw(st.integers(0, 2**63)), preset=draw(st.sampled_from(list(PRESETS))), model=model,
              augment=draw(st.booleans()), lr=draw(positive(10.)), wd=draw(non_negative(10.)),
              opt=draw(st.sampled_from(list(OPTIMIZERS))), sched=draw(optional(st.sampled_from(SCHEDULERS))),
              warmup_pct=draw(fraction()), epochs=draw(st.integers(1, 10**6)),
              precision=draw(st.sampled_from(list(PRECISIONS))), clip_norm=draw(optional(positive())),
              accum_steps=draw(st.integers(1, 1024)), nonfinite=draw(optional(st.sampled_from(NONFINITE))),
              **draw(loss_parts()), mixup_alpha=draw(non_negative(10.)), cutmix_alpha=draw(non_negative(10.)),
              ema_decay=draw(optional(st.floats(1e-6, 1 - 1e-6))), patience=patience, monitor=monitor, out_dir=draw(optional(text)),
              ckpt_every_steps=draw(optional(st.integers(1, 10**6))), keep_last=draw(st.integers(1, 100)),
              tensorboard=draw(st.booleans()), device=draw(optional(st.sampled_from(['cpu', 'cuda', 'cuda:1', 'mps', 'meta']))),
              log_every=draw(st.integers(1, 10**4)), compile=draw(st.booleans()))
    names = {f for f in TrainConfig.__dataclass_fields__}
    return TrainConfig(**{k: v for k, v in kw.items() if k in names})

@SETTINGS
@given(configs())
def test_config_dict_roundtrip(cfg):
    "A valid config comes back unchanged from its dict."
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg

@SETTINGS
@given(configs())
def test_config_json_roundtrip(cfg):
    "... from JSON text."
    assert TrainConfig.from_json(cfg.to_json()) == cfg

@SETTINGS
@given(configs())
def test_config_yaml_roundtrip(cfg):
    "... and from YAML text (strings that look like numbers, booleans or null must stay strings)."
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg

@settings(max_examples=40, deadline=None)
@given(st.sampled_from(['root', 'out_dir', 'monitor']),
       st.sampled_from(['1e3', '4e-3', '1.5', '10', 'true', 'no', 'null', '~', '0x1F', '1_000', '.inf', '2024-01-01', '']))
def test_config_yaml_keeps_number_like_strings(field, value):
    "A string field holding text that YAML could read as a number, a boolean, a date or null is written quoted."
    cfg = TrainConfig(**{field: value})
    assert getattr(TrainConfig.from_yaml(cfg.to_yaml()), field) == value

# --- losses ----------------------------------------------------------------------------------------------------------
def logits(B, C): return arrays(np.float32, (B, C), elements=st.floats(-1e4, 1e4, width=32))

@st.composite
def batches(draw):
    B, C = draw(st.integers(1, 8)), draw(st.integers(2, 6))
    preds = torch.from_numpy(draw(logits(B, C)))
    labels = torch.tensor(draw(st.lists(st.integers(0, C - 1), min_size=B, max_size=B)))
    return preds, labels

@SETTINGS
@given(batches(), st.sampled_from(['cross_entropy', 'focal']), fraction(0.9), non_negative(5.))
def test_class_losses_finite_non_negative(batch, loss, ls, gamma):
    "Cross-entropy and focal losses of finite logits (up to +-1e4) and valid labels are finite and >= 0, per sample too."
    preds, y = batch
    kw = dict(gamma=gamma) if loss == 'focal' else {}
    per = LossCalculator(loss, label_smoothing=ls, reduction='none', **kw)(preds, y)
    assert per.shape == (len(y),)
    assert torch.isfinite(per).all() and (per >= 0).all(), per

@SETTINGS
@given(batches(), st.floats(0.01, 10))
def test_soft_target_losses_finite_non_negative(batch, temp):
    "... with soft targets (rows of probabilities, as MixUp makes) too, and for mse and bce."
    preds, y = batch
    soft = torch.softmax(torch.randn(preds.shape, generator=torch.Generator().manual_seed(len(y))) / temp, -1)
    for loss in LOSSES:
        v = LossCalculator(loss)(preds, soft)
        assert torch.isfinite(v) and v >= 0, (loss, v)

@SETTINGS
@given(batches(), fraction(0.9))
def test_focal_gamma0_is_cross_entropy(batch, ls):
    "Focal loss with gamma=0 is cross-entropy (with the same label smoothing)."
    preds, y = batch
    torch.testing.assert_close(focal_loss(preds, y, gamma=0., label_smoothing=ls),
                               F.cross_entropy(preds, y, label_smoothing=ls), rtol=1e-5, atol=1e-5)

# --- data order ------------------------------------------------------------------------------------------------------
@SETTINGS
@given(st.integers(0, 300), st.integers(1, 64), st.booleans(), st.integers(0, 2**31), st.integers(0, 50))
def test_loader_visits_each_item_once(n, bs, shuffle, seed, epoch):
    "In every epoch a `TensorLoader` yields each item exactly once, in ceil(n / bs) batches of at most bs."
    x, y = torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n)
    dl = TensorLoader(x, y, bs, shuffle=shuffle, seed=seed)
    dl.set_epoch(epoch)
    bs_seen = [len(yb) for _, yb in dl]
    seen = torch.cat([yb for _, yb in dl]) if n else torch.zeros(0, dtype=torch.long)
    assert len(bs_seen) == len(dl) == math.ceil(n / bs) and all(b <= bs for b in bs_seen)
    assert sorted(seen.tolist()) == list(range(n))
    assert torch.equal(torch.cat([xb[:, 0] for xb, _ in dl]).long() if n else seen, seen)  # inputs stay with their labels

@SETTINGS
@given(st.integers(1, 300), st.integers(1, 64), st.integers(0, 2**31), st.integers(0, 50), st.data())
def test_loader_resumes_mid_epoch(n, bs, seed, epoch, data):
    "`iter_from(k)` yields exactly the batches after the first k of the same epoch (what a mid-epoch resume relies on)."
    dl = TensorLoader(torch.arange(n)[:, None], torch.arange(n), bs, shuffle=True, seed=seed)
    dl.set_epoch(epoch)
    full = [yb for _, yb in dl]
    k = data.draw(st.integers(0, len(full)))
    rest = [yb for _, yb in dl.iter_from(k)]
    assert len(rest) == len(full) - k and all(torch.equal(a, b) for a, b in zip(rest, full[k:]))

@SETTINGS
@given(st.integers(1, 300), st.integers(1, 32), st.integers(2, 5), st.booleans(), st.integers(0, 1000))
def test_sharded_loaders_cover_the_data(n, bs, world_size, shuffle, seed):
    "The ranks' shards together cover every item; each rank gets ceil(n / world_size) items (padding repeats a few)."
    shards = [torch.cat([yb for _, yb in TensorLoader(torch.zeros(n, 1), torch.arange(n), bs, shuffle=shuffle, seed=seed,
                                                      rank=r, world_size=world_size)]) for r in range(world_size)]
    assert all(len(s) == math.ceil(n / world_size) for s in shards)
    assert set(torch.cat(shards).tolist()) == set(range(n))

# --- schedules -------------------------------------------------------------------------------------------------------
@st.composite
def schedules(draw):
    sched = draw(st.sampled_from((None,) + SCHEDULERS))
    total = draw(st.integers(2, 400))
    kw = dict(sched=sched, total_steps=total, lr=draw(st.floats(1e-6, 1.)))
    if sched != 'onecycle': kw['warmup_pct'] = draw(st.sampled_from([0., 0.05, 0.1, 0.3]))
    if round(kw.get('warmup_pct', 0) * total) >= total: kw['warmup_pct'] = 0.
    if sched == 'cosine': kw['min_lr'] = draw(st.floats(0., 0.99)) * kw['lr']
    if sched == 'step': kw['step_size'] = draw(st.integers(1, 100))
    if sched == 'multistep': kw['milestones'] = sorted(set(draw(st.lists(st.integers(1, 400), min_size=1, max_size=4))))
    if sched in ('step', 'multistep', 'exponential'): kw['gamma'] = draw(st.floats(0.01, 1.))
    return kw

@SETTINGS
@given(schedules())
def test_schedule_within_bounds(kw):
    "Every learning rate of a run lies in [lowest, peak]: the warm-up's start, a cosine's floor, onecycle's ends."
    om = OptimizerManager(torch.nn.Linear(2, 2), 'sgd', **kw)
    lrs, peak = om.schedule(kw['total_steps']), kw['lr']
    assert lrs.shape == (kw['total_steps'], len(om.opt.param_groups))
    assert np.isfinite(lrs).all() and (lrs <= peak * (1 + 1e-9)).all(), (lrs.max(), peak)
    if kw['sched'] == 'onecycle': low = peak / 25 / 1e4                 # initial lr / final_div_factor
    elif kw['sched'] in ('step', 'multistep', 'exponential'): low = 0.  # decays towards 0 by design
    else: low = min(kw.get('min_lr', peak), 0.01 * peak if kw.get('warmup_pct') else peak)
    assert (lrs >= low * (1 - 1e-9)).all(), (lrs.min(), low)
    if kw['sched'] in (None, 'constant') and not kw.get('warmup_pct'): assert (lrs == peak).all()
    if kw['sched'] == 'cosine': assert lrs[-1].min() >= kw['min_lr'] * (1 - 1e-9)
