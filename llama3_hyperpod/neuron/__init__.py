"""The Neuron backend as data: which Trainium instance a config is for, the env NxDT's scripts and orchestrator set,
the launch lines for compile and train, and NxD checkpoint discovery. Nothing here runs NxDT; plan.py assembles it."""
