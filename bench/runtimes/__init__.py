"""Owns: the container-runtime side of the testbed — assets (pause binary, busybox rootfs),
OCI specs and bundles, the runc wrapper, shim v2 process control and shim event receipt.

Modules: assets, oci, runc, shimv2, events, measure (micro-benchmark, not imported by others).
"""
