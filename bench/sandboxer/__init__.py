"""Owns: the Kuasar-like sandboxer: one long-lived process serving the Sandbox API Controller
(legacy or current schema) for every pod, pinning each pod's namespaces itself (no pause
process) and serving the Task API of every pod in-process over one ttrpc socket per sandbox;
or (`--backend vm`, module `vms`) running each pod in a QEMU microVM whose guest agent serves
the Task API at the address Start returns.

Entry point: `chainbench sandboxer --listen SOCK --dir DIR --schema legacy|current`
(`bench.sandboxer.server.main`).
"""
