"""Linear probing: the backbone frozen, only the classifier (fc_norm + head) trained."""
from __future__ import annotations

import lora
from methods import Method, register
from methods.full import _nothing_to_inject

LINEAR = register(Method(name="linear", summary="linear probe: only fc_norm + head trained",
                         inject=_nothing_to_inject, mark_trainable=lora.mark_trainable))
