"""c8: a behavioural-monitoring sensor for Linux hosts and containers."""
