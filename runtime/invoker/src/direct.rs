//! Model calls with no guest: the Open Inference Protocol's `infer` runs a
//! model a function serves (`[[models]] serve = true`) straight through the
//! shared warm cache and batcher, admitted, metered and billed like an
//! invocation of the function: one usage record, its compute billed.

use bytes::Bytes;
use hearth_bridge::{Inferred, TensorHandle};
use hearth_manifest::Qos;
use hearth_registry::Deployed;

use crate::{Failure, Invoker, Meter, ResponseBody};

impl Invoker {
    /// Runs model `model` of `deployed` on `inputs` at `class`, with no
    /// guest; `render` turns the outputs into the answer, which goes out
    /// once the record has committed. A failure is recorded and returned.
    pub async fn infer(
        &self,
        meter: Meter,
        deployed: &Deployed,
        model: &str,
        inputs: &[(&str, &TensorHandle)],
        class: Qos,
        render: impl FnOnce(&Inferred) -> (http::response::Parts, Bytes),
    ) -> Result<http::Response<ResponseBody>, Failure> {
        // The tenant's concurrency is held for the model's run.
        let (meter, _permit) = self.admit_tenant(meter, deployed).await?;
        let inferred = match self
            .nn
            .infer(&deployed.grants.models, model, inputs, class.urgency())
            .await
        {
            Ok(inferred) => inferred,
            Err(err) => {
                meter.model_failed(model);
                return Err(meter.refuse(Failure::Model(err)).await);
            }
        };
        let (head, body) = render(&inferred);
        meter.inferred(&inferred.usage, head, body).await
    }
}
