"""Track stage: from validated events to the task table, workers and counts."""
