"""The layout planner: which module goes on which GPU, and what each GPU will hold, before loading anything."""

from .plan import DeviceBudget, Plan, plan

__all__ = ["DeviceBudget", "Plan", "plan"]
