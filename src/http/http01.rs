//! Answering ACME http-01 challenges on the plain HTTP listeners, from the
//! tokens the ACME manager (`tls::acme`) has pending.

use super::body::ResponseBody;
use crate::runtime::Runtime;
use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::Full;

/// The answer to `GET {path}` when it fetches the token of a challenge this
/// instance is validating right now. The proxy calls this before routing and
/// before `redirect_https`. Unknown tokens get `None` and are routed like any
/// request, so a node running its own ACME client keeps working behind amslb.
pub fn answer(runtime: &Runtime, path: &str) -> Option<Response<ResponseBody>> {
    let key_authorization = runtime
        .tls
        .load()
        .as_ref()?
        .certs
        .challenges()
        .http01_response(path)?;
    let mut response = Response::new(ResponseBody::Local(Full::new(Bytes::from(
        key_authorization,
    ))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Some(response)
}
