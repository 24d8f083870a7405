"""The ``__call__`` of a few-step pipeline as its readers see it.

:class:`FewStepPipelineMixin` wraps the pipeline's own ``__call__`` with ``(*args, **kwargs)``. The class decorator
:func:`with_stock_call` gives each class a ``__call__`` that runs the mixin's and carries the wrapped call's real
signature and docstring, so ``help(pipe)``, ``inspect.signature(pipe.__call__)`` and IDEs list ``prompt``,
``num_inference_steps``, ``guidance_scale``, ... (or ``class_labels`` for the digits pipeline).
"""

from __future__ import annotations

import functools
import inspect

from .mixin import FewStepPipelineMixin

STUDENT_NOTE = (
    "Few-step pipeline: with a student's metadata (``pipe.student``), ``num_inference_steps`` and the guidance default "
    "to the values the student records (a guidance-baked student samples without CFG); without metadata this is the "
    "call of ``{base}``, unchanged."
)


def _stock(cls: type) -> type:
    """The first class after :class:`FewStepPipelineMixin` in ``cls``'s MRO that defines ``__call__``."""
    for base in cls.__mro__:
        if "__call__" in vars(base) and not issubclass(base, FewStepPipelineMixin):
            return base
    raise TypeError(f"{cls.__name__} has no pipeline __call__ after FewStepPipelineMixin.")


def with_stock_call(cls: type) -> type:
    """Class decorator: ``cls.__call__`` runs :meth:`FewStepPipelineMixin.__call__` and shows the stock call's
    signature (``__wrapped__``, which ``inspect.signature`` follows) and docstring."""
    base = _stock(cls)
    stock = base.__call__

    @functools.wraps(stock)
    def __call__(self, *args, **kwargs):
        return FewStepPipelineMixin.__call__(self, *args, **kwargs)

    __call__.__module__ = cls.__module__
    __call__.__qualname__ = f"{cls.__qualname__}.__call__"
    __call__.__doc__ = STUDENT_NOTE.format(base=base.__name__) + "\n\n" + inspect.cleandoc(stock.__doc__ or "")
    cls.__call__ = __call__
    return cls
