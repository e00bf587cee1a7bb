"""Owns: the iSulad-like CRI engine package (CRI server, sandboxes, controllers, config).

Modules: `config` (TOML), `ids` (wire id/name validation), `errors` (gRPC status mapping),
`sandbox` (records + state machine), `store` (atomic JSON persistence), `controller` (the
Controller interface + call deadlines), `tasks` (containers over a pod's Task API),
`shim_controller`, `sandboxer_controller`, `spec` (CRI → OCI spec), `manager` (pod lifecycle,
recovery) with `containers` (container lifecycle), `cri` (the CRI servicer), `server`
(`chainbench engine`), `harness` (the engine as a child process, for tests and benches).
"""
