// SPDX-License-Identifier: Apache-2.0
use super::*;
use crate::conceal::clouds::{AZURE, GCP};

#[test]
fn segments_outside_the_grammar_are_named() {
    for (segment, refused) in [
        ("meta-data", false),
        ("0e:49:61:0f:c3:11", false),
        ("2021-07-15", false),
        ("v1.2", false),
        ("..", true),
        (".", true),
        ("iam.", true),
        ("..;", true),
        ("x ", true),
        ("a;b", true),
        ("a,b", true),
        ("a%b", true),
        ("a b", true),
        ("a*", true),
    ] {
        assert_eq!(segment_problem(segment).is_some(), refused, "{segment:?}");
    }
    assert!(raw_target_problem("/latest/meta-data/placement/..;/iam").is_some());
    assert!(raw_target_problem("/computeMetadata/v1/?alt=json;recursive=true").is_some());
    assert!(raw_target_problem("/latest/meta-data/placement/region").is_none());
}

#[test]
fn gcp_parameters_are_parsed_strictly_and_rebuilt() {
    let q = Query::parse(Some("recursive=true&alt=json"), GCP.query_params).unwrap();
    assert!(q.recursive());
    assert_eq!(q.to_string(), "recursive=true&alt=json");
    let q = Query::parse(Some("recursive=%74rue&timeout_sec=60&last_etag=0a1b"), GCP.query_params).unwrap();
    assert_eq!(q.to_string(), "recursive=true&timeout_sec=60&last_etag=0a1b", "escapes decoded, query rebuilt");
    assert_eq!(Query::parse(None, GCP.query_params).unwrap(), Query::default());
    for bad in [
        "recursive=false",
        "recursive=False",
        "recursive=FALSE",
        "recursive=True",
        "recursive=1",
        "recursive=",
        "recursive",
        "recursive=true&recursive=false",
        "alt=xml",
        "alt=JSON",
        "wait_for_change=false",
        "timeout_sec=0",
        "timeout_sec=-1",
        "last_etag=XYZ",
        "Recursive=true",
        "recursive=true&",
        "&recursive=true",
        "",
        "foo=bar",
        "alt=json%3Brecursive%3Dtrue",
        "alt=%ff",
    ] {
        assert!(Query::parse(Some(bad), GCP.query_params).is_err(), "{bad:?} passed");
    }
}

#[test]
fn azure_parameters_are_parsed_strictly() {
    assert!(Query::parse(Some("api-version=2021-02-01&format=text"), AZURE.query_params).is_ok());
    assert!(Query::parse(Some("api-version=2021-12-13-preview"), AZURE.query_params).is_ok());
    for bad in ["api-version=latest", "api-version=2021-02-01&api-version=2018-02-01", "format=TEXT", "resource=x"] {
        assert!(Query::parse(Some(bad), AZURE.query_params).is_err(), "{bad:?} passed");
    }
}
