"""The SFPK simulation: config, state, the pure update, compiled particle modes, the host loop."""
