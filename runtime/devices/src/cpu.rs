//! The CPU device: tract's default runtime.

use tract_onnx::tract_core::runtime::DefaultRuntime;

use crate::{Device, DeviceId, PreparedModel, Result};

/// Runs models on the host CPU with tract.
#[derive(Debug, Default)]
pub struct CpuDevice;

impl CpuDevice {
    /// The CPU device.
    pub fn new() -> CpuDevice {
        CpuDevice
    }
}

impl Device for CpuDevice {
    fn id(&self) -> DeviceId {
        DeviceId::Cpu
    }

    fn prepare(&self, onnx: &[u8]) -> Result<PreparedModel> {
        PreparedModel::compile(onnx, &DefaultRuntime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeviceError;
    use tract_onnx::prelude::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_plain_array_view::<f32>().expect("f32").iter().copied().collect()
    }
    use crate::Dim;
    use hearth_fixtures::models::{MLP_CLASSES, MLP_INPUTS, mlp, mlp_input};

    fn rows(n: u64) -> Tensor {
        let data: Vec<f32> = (0..n).flat_map(mlp_input).collect();
        Tensor::from_shape(&[n as usize, MLP_INPUTS], &data).expect("tensor")
    }

    #[test]
    fn prepares_the_mlp_with_a_batch_axis() {
        let model = CpuDevice::new().prepare(&mlp(1)).expect("prepare");
        assert_eq!(model.inputs()[0].name, "input");
        assert_eq!(model.inputs()[0].dims, [Dim::Batch, Dim::Fixed(MLP_INPUTS)]);
        assert_eq!(model.outputs()[0].name, "output");
        assert_eq!(model.outputs()[0].dims, [Dim::Batch, Dim::Fixed(MLP_CLASSES)]);
        assert!(model.batchable());
    }

    #[test]
    fn a_batch_equals_its_rows_run_alone() {
        let model = CpuDevice::new().prepare(&mlp(1)).expect("prepare");
        let batch = model.run(vec![rows(3)]).expect("run");
        let batch = values(&batch[0]);
        for n in 0..3u64 {
            let one = Tensor::from_shape(&[1, MLP_INPUTS], &mlp_input(n)).expect("tensor");
            let alone = model.run(vec![one]).expect("run");
            let alone = values(&alone[0]);
            let row = &batch[n as usize * MLP_CLASSES..(n as usize + 1) * MLP_CLASSES];
            for (a, b) in alone.iter().zip(row) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            }
            assert!((alone.iter().sum::<f32>() - 1.0).abs() < 1e-5, "softmax sums to 1");
        }
    }

    #[test]
    fn inputs_are_checked_and_bad_models_refused() {
        let model = CpuDevice::new().prepare(&mlp(1)).expect("prepare");
        assert!(model.check_input(0, DatumType::F32, &[4, MLP_INPUTS]).is_ok());
        for shape in [
            &[4, 783][..],
            &[MLP_INPUTS][..],
            &[0, MLP_INPUTS][..],
            &[1, 1, MLP_INPUTS][..],
        ] {
            assert!(
                matches!(
                    model.check_input(0, DatumType::F32, shape),
                    Err(DeviceError::InvalidInput(_))
                ),
                "{shape:?}"
            );
        }
        assert!(model.check_input(0, DatumType::I64, &[1, MLP_INPUTS]).is_err());
        assert!(model.check_input(1, DatumType::F32, &[1, MLP_INPUTS]).is_err());
        for bad in [&b"not onnx"[..], &[][..]] {
            assert!(matches!(
                CpuDevice::new().prepare(bad),
                Err(DeviceError::InvalidModel(_))
            ));
        }
    }
}
