"""``stalwart launch``: the elastic node agent (torch.distributed.elastic), resize, hot spares, exclusion, preemption.

See :mod:`stalwart.launcher.main` for the command and :mod:`stalwart.launcher.agent`
for the membership rules. :func:`exclude_node` is the one call the health side needs.
"""

from stalwart.launcher.exclusion import EXIT_NODE_EXCLUDED, exclude_node

__all__ = ["EXIT_NODE_EXCLUDED", "exclude_node"]
