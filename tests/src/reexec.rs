// SPDX-License-Identifier: Apache-2.0
//! The test programs re-execute themselves for their helper processes: a pod's
//! sandbox, an attempt made from inside a pod, a benchmark worker. `<exe> <role>
//! <args...>` runs the role and exits; nothing else of the program runs.

use anyhow::Result;

use crate::sandbox;

/// A role: the first argument that selects it, and what the process then does with
/// the arguments after it.
pub type Role = (&'static str, fn(&[String]) -> Result<()>);

/// When `argv[1]` names one of `roles` (or the pod sandbox, which every program with a
/// simulated node needs), runs it and exits: 0 after `Ok`, 2 with the error printed.
/// Returns when it names none.
pub fn run_role(program: &str, argv: &[String], roles: &[Role]) {
    let sandbox: Role = (sandbox::SANDBOX_ARG, sandbox::child_main);
    let Some(name) = argv.get(1) else { return };
    let Some((role, main)) = std::iter::once(&sandbox).chain(roles).find(|(role, _)| role == name) else { return };
    if let Err(e) = main(&argv[2..]) {
        eprintln!("{program} {role}: {e:#}");
        std::process::exit(2);
    }
    std::process::exit(0);
}

/// The first argument of a role that takes one (a JSON request, a path), or "".
pub fn first(args: &[String]) -> &str {
    args.first().map_or("", String::as_str)
}
