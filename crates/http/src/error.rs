//! Every error leaves as `{"error": "<human message>", "reason": "<snake_case code>"}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use pipeline_core::{Refusal, RefusalClass};
use serde::Serialize;

/// Seconds a sender should wait before retrying after a 503.
const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    /// Close the connection after answering (the request was not read to its end).
    pub close_connection: bool,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    reason: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
            retry_after: None,
            close_connection: false,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let status = match refusal.class() {
            RefusalClass::NotFound => StatusCode::NOT_FOUND,
            RefusalClass::Unauthorized => StatusCode::UNAUTHORIZED,
            RefusalClass::Forbidden => StatusCode::FORBIDDEN,
            RefusalClass::BadRequest => StatusCode::BAD_REQUEST,
            RefusalClass::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            RefusalClass::Conflict => StatusCode::CONFLICT,
            RefusalClass::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        let error = ApiError::new(status, refusal.reason(), refusal.to_string());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            error.with_retry_after(UNAVAILABLE_RETRY_AFTER_SECS)
        } else {
            error
        }
    }
}

impl From<pipeline_core::StoreError> for ApiError {
    fn from(err: pipeline_core::StoreError) -> Self {
        Refusal::from(err).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: &self.message,
            reason: self.reason,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.close_connection {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
