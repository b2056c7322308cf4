"""Online expert load balancing: placement policies, transfer plans, the EPLB actor and the worker extension."""
