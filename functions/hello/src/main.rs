//! The smallest Hearth function: answers every request with a greeting.
use hearth_guest::prelude::*;

hearth_guest::handler!(hello);

async fn hello(_request: Request<Body>) -> Result<Response<Body>> {
    Ok(text(StatusCode::OK, "hello from hearth\n"))
}
