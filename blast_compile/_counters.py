"""``torch._dynamo.utils.counters``, imported at first use: the ops register at ``import blast_compile``, and
importing Dynamo for its counters would double that import's time."""


class _Counters:
    def __getitem__(self, key):
        from torch._dynamo.utils import counters

        return counters[key]


counters = _Counters()
