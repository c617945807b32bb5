"""The stage side of a pod: a stage process (`agent`), what it does with a task
(`work`; a call stage's client, `call`), a node's workers in one container
(`container`) and the pre-warmed fork server they come from (`forkserver`). Never
imports the conductor: the two meet through the wire and the run directory."""
