// SPDX-License-Identifier: Apache-2.0
//! Refused attempts → audit records and metrics: the kernel's ring buffer (and any
//! other enforcement point, through [`crate::supervise::Context::attempts`]) read,
//! each attempt named after its pod, deduplicated and written.

mod pipeline;
mod reader;

pub(crate) use pipeline::Pipeline;
pub(crate) use reader::EventReader;
