"""Expert placement policies: one file each, registered by name with ``@register_policy``."""

from moesim.policies.base import (
    History,
    Policy,
    available_policies,
    make_policy,
    policy_class,
    register_policy,
)

__all__ = ["History", "Policy", "available_policies", "make_policy", "policy_class",
           "register_policy"]
