// SPDX-License-Identifier: Apache-2.0
//! Conceal mode's strict grammar on the real kernel: the request targets a lenient
//! server could read as a concealed path, under the trees that pass whole, are
//! refused at the proxy and nothing reaches the service (the unit tests judge the
//! same forms and many more, in agent/src/conceal/decide_tests.rs).

use anyhow::Result;

use crate::{
    conceal::{conceal_agent, expect, get, metadata},
    harness::{Ctx, Who, METADATA_V4},
};

pub(crate) const SCENARIOS: [crate::Scenario; 1] =
    [("conceal grammar: `..;`, `..%20`, `;` separators and `recursive=False` never reach the service", lenient_forms)];

fn lenient_forms(ctx: &mut Ctx) -> Result<()> {
    conceal_agent(ctx, None)?;
    let imds = metadata(METADATA_V4);
    let google = "Metadata-Flavor: Google\r\n";
    let azure = "Metadata: true\r\n";
    for (path, headers) in [
        ("/latest/meta-data/placement/..;/iam/security-credentials/", ""),
        ("/latest/meta-data/placement/..%20/iam/security-credentials/", ""),
        ("/latest/meta-data/placement/region;/../../iam/info", ""),
        ("/latest/meta-data/placement/region.", ""),
        ("/latest/meta-data/spot/..%3b/iam/info", ""),
        ("/computeMetadata/v1/instance/network-interfaces/..;/service-accounts/default/token", google),
        ("/computeMetadata/v1/instance/network-interfaces/?alt=json;recursive=true", google),
        ("/computeMetadata/v1/instance/network-interfaces/?recursive=False", google),
        ("/computeMetadata/v1/instance/network-interfaces/?recursive=FALSE", google),
        ("/computeMetadata/v1/instance/?recursive=true&recursive=false", google),
    ] {
        expect(ctx, Who::Pod(0), imds, &get(path, headers), 404, 0)?;
    }
    let network = "/metadata/instance/network/..;/identity/oauth2/token?api-version=2018-02-01";
    expect(ctx, Who::Pod(0), imds, &get(network, azure), 404, 0)?;
    expect(ctx, Who::Pod(0), imds, &get("/metadata/instance/network/interface?api-version=x", azure), 400, 0)?;
    Ok(())
}
