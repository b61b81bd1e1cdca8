"""(Provisional: the issue-27 work replaces this with the full mechanism, same API.)"""
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakIdKeyDictionary

_STEPS = WeakIdKeyDictionary()


def watch(t):
    if t is not None and t not in _STEPS:
        _STEPS[t] = 0


def _after_step(opt, args, kwargs):
    if not any(g.get("fused") for g in opt.param_groups):
        return
    for g in opt.param_groups:
        for p in g["params"]:
            if p in _STEPS:
                _STEPS[p] += 1


from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

register_optimizer_step_post_hook(_after_step)


def _state(t):
    if t is None:
        return None
    s = t.untyped_storage()
    return (s._cdata, None if t.is_inference() else t._version, t.storage_offset(), tuple(t.shape), t.stride(),
            _STEPS.get(t, 0))


class Snapshot:
    def __init__(self, ts):
        self.update(ts)

    def update(self, ts):
        ts = list(ts)
        self._refs = [None if t is None else StorageWeakRef(t.untyped_storage()) for t in ts]
        self._states = [_state(t) for t in ts]

    def changed(self, ts) -> bool:
        return any(_state(t) != s for t, s in zip(ts, self._states))
