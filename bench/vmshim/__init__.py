"""Owns: chainbench's per-pod shim v2 for the microVM flavor (`containerd-shim-chainbench-vm-v2`).

Kata-style: the engine starts one shim per pod with the shim v2 `start` protocol; on the pod's
first Task.Create the shim boots (or restores) a microVM, waits for the guest agent, and from then
on relays Task API calls to the agent over ttrpc without re-encoding them.

    python -m bench.vmshim -namespace NS -address A -publish-binary B -id ID start   (cwd = bundle)

Modules: `main` (flags, dispatch, wrapper binary), `launch` (start/delete actions, socket
paths, state file), `daemon` (the Task service, the relay, the process), `podvm` (the pod's VM
as the shim sees it), `vm` (backend interface, `host` backend), `qemu_adapter` (the QEMU
backend on bench.vm.qemu, template snapshots), `events` (task events to TTRPC_ADDRESS),
`measure` (start time and relay overhead figures).
"""
