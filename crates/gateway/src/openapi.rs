//! The gateway's part of the OpenAPI document: the gateway wraps every service's API, so what
//! it adds (the `X-API-KEY` it requires, the refusals it answers itself before any service)
//! goes onto every operation of the document the services describe.

use utoipa::openapi::header::Header;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, ObjectBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder, Type};

/// The name of the security scheme: an API key in the `X-API-KEY` header.
const API_KEY: &str = "api_key";

/// The responses the gateway gives itself, for every route: (status, when).
const REFUSALS: &[(&str, &str)] = &[
    ("400", "A malformed request: two `X-API-KEY` headers, a bad header value"),
    ("401", "No API key, or an unknown one (`X-API-KEY`); or a signed URL that is bad or expired"),
    ("408", "The client did not send its request (its image's header, its body) in time"),
    ("413", "The body (or the image, read from its header) is over the route's limit"),
    ("414", "The request target is longer than allowed"),
    ("429", "Over the key's rate; retry after `Retry-After` seconds"),
    ("431", "The request's header fields are larger than allowed"),
    ("502", "The service behind the route could not be reached; retry"),
    ("503", "The route is at its limit of requests (or streams) in flight, or shutting down; retry after `Retry-After`"),
    ("504", "The service behind the route did not answer in time; retry"),
];

/// The gateway's own operations (`GET /api/cluster`).
#[derive(utoipa::OpenApi)]
#[openapi(paths(crate::cluster::answer), components(schemas(crate::cluster::ClusterView)))]
struct Own;

/// The operations the gateway answers itself, to merge before [`wrap`].
pub fn own() -> OpenApi {
    <Own as utoipa::OpenApi>::openapi()
}

/// `doc` as clients see it through the gateway: every operation needs the API key and may be
/// refused by the gateway (see [`REFUSALS`]); an operation that documents one of those
/// statuses itself keeps its own description.
pub fn wrap(mut doc: OpenApi) -> OpenApi {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        API_KEY,
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
            "X-API-KEY",
            "An API key of the gateway's key list (`pixmesh up` prints a development key)",
        ))),
    );
    doc.security = Some(vec![SecurityRequirement::new(API_KEY, Vec::<String>::new())]);
    for item in doc.paths.paths.values_mut() {
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ]
        .into_iter()
        .flatten()
        {
            for (status, when) in REFUSALS {
                operation.responses.responses.entry((*status).to_string()).or_insert_with(|| RefOr::T(refusal(status, when)));
            }
        }
    }
    doc
}

fn refusal(status: &str, when: &str) -> Response {
    let body = Content::new(Some(Ref::from_schema_name("ErrorBody")));
    let mut response = ResponseBuilder::new().description(when).content("application/json", body);
    if matches!(status, "429" | "503") {
        let seconds = ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)).build();
        response = response.header("Retry-After", Header::new(seconds));
    }
    response.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItem, PathsBuilder};

    #[test]
    fn every_operation_needs_the_key_and_lists_the_gateways_refusals_keeping_its_own() {
        let own = Response::new("mine");
        let operation = OperationBuilder::new().response("200", Response::new("ok")).response("503", own.clone()).build();
        let doc = utoipa::openapi::OpenApiBuilder::new()
            .paths(PathsBuilder::new().path("/api/x", PathItem::new(HttpMethod::Get, operation)))
            .build();
        let doc = serde_json::to_value(wrap(doc)).unwrap();
        let responses = &doc["paths"]["/api/x"]["get"]["responses"];
        for (status, _) in REFUSALS {
            assert!(responses.get(*status).is_some(), "{status}: {responses}");
        }
        assert_eq!(responses["503"]["description"], "mine");
        assert_eq!(responses["429"]["headers"]["Retry-After"]["schema"]["type"], "integer");
        assert_eq!(doc["components"]["securitySchemes"][API_KEY]["name"], "X-API-KEY");
        assert_eq!(doc["security"][0][API_KEY], serde_json::json!([]));
    }
}
