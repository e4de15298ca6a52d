// SPDX-License-Identifier: Apache-2.0
//! What each cloud's metadata service may tell a pod, as plain data.
//!
//! Deny by default: a request passes only when an `allow` rule (or one of the pod's
//! extra paths) matches it. The `deny` rules change nothing about what passes; they
//! name what a refusal protected, so that the refusal says which rule it was.
//!
//! Pattern syntax, one item per path segment: a literal, `*` for any one segment,
//! `{aws-version}` for `latest` or an API date (`2021-07-15`), and a final `**` for any
//! number of further segments (none included), which also permits GCP's
//! `?recursive=true` on the pattern's directory.

use super::grammar::{Param, Value};

/// A cloud whose metadata paths the proxy knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Cloud {
    Aws,
    Gcp,
    Azure,
}

impl Cloud {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Cloud::Aws => "aws",
            Cloud::Gcp => "gcp",
            Cloud::Azure => "azure",
        }
    }
}

/// Request methods a rule covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Methods {
    /// GET and HEAD.
    Read,
    /// PUT only (the IMDSv2 session token).
    Put,
}

impl Methods {
    pub(crate) fn covers(self, method: &str) -> bool {
        match self {
            Methods::Read => method == "GET" || method == "HEAD",
            Methods::Put => method == "PUT",
        }
    }
}

/// One path rule: a name for logs and refusals, a metrics class, methods and pattern.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rule {
    pub name: &'static str,
    pub class: &'static str,
    pub methods: Methods,
    pub pattern: &'static str,
}

const fn read(name: &'static str, class: &'static str, pattern: &'static str) -> Rule {
    Rule { name, class, methods: Methods::Read, pattern }
}

const fn deny(name: &'static str, pattern: &'static str) -> Rule {
    Rule { name, class: "refused", methods: Methods::Read, pattern }
}

/// A header the cloud's metadata service requires, and how it refuses without it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequiredHeader {
    pub name: &'static str,
    /// Compared case-insensitively, as the services do.
    pub value: &'static str,
}

#[derive(Debug)]
pub(crate) struct CloudRules {
    pub cloud: Cloud,
    /// Paths are matched lower-cased (the service itself ignores case).
    pub case_insensitive: bool,
    pub required_header: Option<RequiredHeader>,
    /// Status of a refusal: what this cloud's SDKs read as "not available here" and
    /// give up on at once, without retries.
    pub refuse_status: u16,
    /// Status when the required header is missing, as the real service answers.
    pub missing_header_status: u16,
    /// Request headers copied upstream; every other header is dropped.
    pub forward_headers: &'static [&'static str],
    /// Query parameters passed upstream, each with its value's grammar; any other
    /// parameter refuses the request (`grammar::Query`).
    pub query_params: &'static [Param],
    pub allow: &'static [Rule],
    pub deny: &'static [Rule],
}

/// AWS IMDS (also OpenStack's EC2-compatible tree). botocore gives up on a 404 at
/// once: its credential fetcher makes one attempt (`AWS_METADATA_SERVICE_NUM_ATTEMPTS`
/// defaults to 1) and a non-200 answer ends the lookup with no credentials.
pub(crate) static AWS: CloudRules = CloudRules {
    cloud: Cloud::Aws,
    case_insensitive: false,
    required_header: None,
    refuse_status: 404,
    missing_header_status: 404,
    // Never the IMDSv2 token headers: the proxy answers the token PUT itself and
    // checks pods' tokens; upstream it uses a token of its own (`tokens`).
    forward_headers: &["accept", "user-agent"],
    query_params: &[],
    allow: &[
        Rule { name: "aws-token", class: "token", methods: Methods::Put, pattern: "{aws-version}/api/token" },
        read("aws-listing", "listing", "{aws-version}/meta-data"),
        read("aws-placement", "placement", "{aws-version}/meta-data/placement/**"),
        read("aws-instance-id", "instance", "{aws-version}/meta-data/instance-id"),
        read("aws-instance-type", "instance", "{aws-version}/meta-data/instance-type"),
        read("aws-ami-id", "instance", "{aws-version}/meta-data/ami-id"),
        read("aws-local-hostname", "instance", "{aws-version}/meta-data/local-hostname"),
        read("aws-local-ipv4", "instance", "{aws-version}/meta-data/local-ipv4"),
        read("aws-mac", "instance", "{aws-version}/meta-data/mac"),
        read("aws-hostname", "instance", "{aws-version}/meta-data/hostname"),
        read("aws-events", "events", "{aws-version}/meta-data/events/**"),
        read("aws-spot", "events", "{aws-version}/meta-data/spot/**"),
        read("aws-identity-document", "identity-document", "{aws-version}/dynamic/instance-identity/document"),
    ],
    deny: &[
        deny("aws-iam-credentials", "{aws-version}/meta-data/iam/**"),
        deny("aws-identity-credentials", "{aws-version}/meta-data/identity-credentials/**"),
        deny("aws-user-data", "{aws-version}/user-data/**"),
        deny("aws-signed-identity", "{aws-version}/dynamic/instance-identity/pkcs7"),
        deny("aws-signed-identity", "{aws-version}/dynamic/instance-identity/signature"),
        deny("aws-signed-identity", "{aws-version}/dynamic/instance-identity/rsa2048"),
    ],
};

/// GCE metadata server. google-auth treats any non-200 as "no credentials here"
/// without retrying (it retries only transport errors and 5xx).
pub(crate) static GCP: CloudRules = CloudRules {
    cloud: Cloud::Gcp,
    case_insensitive: false,
    required_header: Some(RequiredHeader { name: "metadata-flavor", value: "Google" }),
    refuse_status: 404,
    missing_header_status: 403,
    forward_headers: &["metadata-flavor", "accept", "user-agent"],
    query_params: &[
        Param { name: "alt", value: Value::OneOf(&["json", "text"]) },
        Param { name: "recursive", value: Value::True },
        Param { name: "wait_for_change", value: Value::True },
        Param { name: "timeout_sec", value: Value::Seconds },
        Param { name: "last_etag", value: Value::Hex },
    ],
    allow: &[
        read("gcp-listing", "listing", "computeMetadata/v1"),
        read("gcp-listing", "listing", "computeMetadata/v1/instance"),
        read("gcp-listing", "listing", "computeMetadata/v1/project"),
        read("gcp-project-id", "project", "computeMetadata/v1/project/project-id"),
        read("gcp-project-id", "project", "computeMetadata/v1/project/numeric-project-id"),
        read("gcp-zone", "placement", "computeMetadata/v1/instance/zone"),
        read("gcp-instance", "instance", "computeMetadata/v1/instance/id"),
        read("gcp-instance", "instance", "computeMetadata/v1/instance/name"),
        read("gcp-instance", "instance", "computeMetadata/v1/instance/hostname"),
        read("gcp-instance", "instance", "computeMetadata/v1/instance/machine-type"),
        read("gcp-instance", "instance", "computeMetadata/v1/instance/cpu-platform"),
        read("gcp-instance", "instance", "computeMetadata/v1/instance/image"),
        read("gcp-instance", "instance", "computeMetadata/v1/instance/tags"),
        read("gcp-network", "network", "computeMetadata/v1/instance/network-interfaces/**"),
        read("gcp-events", "events", "computeMetadata/v1/instance/maintenance-event"),
        read("gcp-events", "events", "computeMetadata/v1/instance/preempted"),
    ],
    deny: &[
        deny("gcp-service-accounts", "computeMetadata/v1/instance/service-accounts/**"),
        deny("gcp-instance-attributes", "computeMetadata/v1/instance/attributes/**"),
        deny("gcp-project-attributes", "computeMetadata/v1/project/attributes/**"),
    ],
};

/// Azure IMDS. azure-identity retries 404 and 5xx with back-off but reads a 400 as
/// "this identity is not available here" at once, so refusals are 400, as is the
/// service's own answer without `Metadata: true`.
pub(crate) static AZURE: CloudRules = CloudRules {
    cloud: Cloud::Azure,
    case_insensitive: true,
    required_header: Some(RequiredHeader { name: "metadata", value: "true" }),
    refuse_status: 400,
    missing_header_status: 400,
    forward_headers: &["metadata", "accept", "user-agent"],
    query_params: &[
        Param { name: "api-version", value: Value::ApiDate },
        Param { name: "format", value: Value::OneOf(&["json", "text"]) },
    ],
    allow: &[
        read("azure-versions", "listing", "metadata/versions"),
        read("azure-location", "placement", "metadata/instance/compute/location"),
        read("azure-zone", "placement", "metadata/instance/compute/zone"),
        read("azure-compute", "placement", "metadata/instance/compute/platformfaultdomain"),
        read("azure-compute", "placement", "metadata/instance/compute/platformupdatedomain"),
        read("azure-compute", "instance", "metadata/instance/compute/vmid"),
        read("azure-compute", "instance", "metadata/instance/compute/vmsize"),
        read("azure-compute", "instance", "metadata/instance/compute/name"),
        read("azure-compute", "instance", "metadata/instance/compute/ostype"),
        read("azure-compute", "instance", "metadata/instance/compute/resourcegroupname"),
        read("azure-compute", "instance", "metadata/instance/compute/subscriptionid"),
        read("azure-compute", "instance", "metadata/instance/compute/vmscalesetname"),
        read("azure-compute", "instance", "metadata/instance/compute/azenvironment"),
        read("azure-network", "network", "metadata/instance/network/**"),
        read("azure-events", "events", "metadata/scheduledevents"),
    ],
    deny: &[
        deny("azure-identity", "metadata/identity/**"),
        deny("azure-attested", "metadata/attested/**"),
        deny("azure-user-data", "metadata/instance/compute/userdata"),
        deny("azure-custom-data", "metadata/instance/compute/customdata"),
    ],
};

pub(crate) static ALL: [&CloudRules; 3] = [&AWS, &GCP, &AZURE];

/// Which cloud's rules judge a path, from its first segment: the three services'
/// trees do not overlap.
pub(crate) fn route(first_segment: &str) -> Option<&'static CloudRules> {
    if first_segment == "latest" || is_aws_date(first_segment) {
        Some(&AWS)
    } else if first_segment == "computeMetadata" {
        Some(&GCP)
    } else if first_segment.eq_ignore_ascii_case("metadata") {
        Some(&AZURE)
    } else {
        None
    }
}

pub(crate) use crate::config::is_aws_date;
