"""Who may use what and what they used: keys, teams, quotas, the usage ledger."""
