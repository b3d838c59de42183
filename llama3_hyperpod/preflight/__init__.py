"""Preflight: the checks one node must pass for one plan before a job spends an hour compiling or training.

`result` (the Check line and the report), `parsers` (tool output -> data, pure), `tools` (running a tool, one line
when it cannot), `host` (what this machine measures: memory, CPUs, disks, sysfs), `checks` (measured figure ->
PASS / WARN / FAIL), `run` (which checks a plan needs, in order). Facts and sources: docs/preflight-facts.md.
"""
