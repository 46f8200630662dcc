"""Orchestration: Ray executor and its in-process twin, shard planning, resume, progress, run
directories. No math and no store layout here."""
