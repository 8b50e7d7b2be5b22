"""The transform: the fp32 cloak (estimators, heads, sigma), its objective, inverter networks, noise spacing."""
