"""Owns: the Kuasar-like sandboxer: one long-lived process serving the Sandbox API Controller
(legacy or current schema) for every pod, pinning each pod's namespaces itself (no pause
process) and serving the Task API of every pod in-process over one ttrpc socket per sandbox.

Entry point: `chainbench sandboxer --listen SOCK --dir DIR --schema legacy|current`
(`bench.sandboxer.server.main`).
"""
