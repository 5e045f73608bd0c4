//! The public API's OpenAPI 3.1 document, assembled from every role's part: the upload and
//! status services describe their own routes (generated from their handlers and types), and
//! the gateway wraps them with what it adds (the API key, its own refusals). Served by the
//! status role at `GET /api/openapi.json`; `pixmesh openapi` prints it.

use utoipa::openapi::{Info, OpenApi, Tag};

/// The whole document.
pub fn document() -> OpenApi {
    let mut doc = pixmesh_upload::openapi::openapi();
    doc.merge(pixmesh_status::openapi::openapi());
    doc.merge(pixmesh_gateway::openapi::own());
    let mut doc = pixmesh_gateway::openapi::wrap(doc);
    let mut info = Info::new("pixmesh", env!("CARGO_PKG_VERSION"));
    info.description = Some(
        "A distributed image-processing service: upload an image with what to make of it, follow the job, download the result. \
         Every request goes through the gateway and needs an API key (`X-API-KEY`)."
            .into(),
    );
    doc.info = info;
    let tag = |name: &str, description: &str| {
        let mut tag = Tag::new(name);
        tag.description = Some(description.into());
        tag
    };
    doc.tags = Some(vec![
        tag("jobs", "Upload images and follow their jobs"),
        tag("results", "Download what the jobs made"),
        tag("meta", "This document"),
        tag("cluster", "What the roles say of themselves (admin keys)"),
    ]);
    doc
}

/// [`document`] as JSON.
pub fn json() -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(&document())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_and_describes_every_public_route() {
        let doc: serde_json::Value = serde_json::from_str(&json().unwrap()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths: Vec<&str> = doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
        for route in [
            "/api/upload",
            "/api/status/{id}",
            "/api/status/{id}/history",
            "/api/status/{id}/events",
            "/api/events",
            "/api/jobs",
            "/api/result/{id}",
            "/api/result/{id}/{output}",
            "/api/openapi.json",
            "/api/cluster",
        ] {
            assert!(paths.contains(&route), "{route} is not in {paths:?}");
        }
        // Every reference names a schema the document has.
        let text = doc.to_string();
        for reference in text.split("\"#/components/schemas/").skip(1) {
            let name = &reference[..reference.find('"').unwrap()];
            assert!(doc["components"]["schemas"].get(name).is_some(), "{name} is referenced but not defined");
        }
        // A named output's download answers as the one result's does.
        let output = &doc["paths"]["/api/result/{id}/{output}"]["get"]["responses"];
        assert_eq!(output["200"], doc["paths"]["/api/result/{id}"]["get"]["responses"]["200"]);
        assert!(output["409"].is_object() && output["304"].is_object(), "{output}");
        // The gateway's wrapping: the key on everything, its refusals on every operation.
        assert_eq!(doc["components"]["securitySchemes"]["api_key"]["in"], "header");
        assert!(doc["paths"]["/api/upload"]["post"]["responses"]["429"].is_object());
    }
}
