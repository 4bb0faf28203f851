"""``ModelConfig`` lives in ``quant.config`` (the converter writes it into every manifest, and quant
never imports mixcli); re-exported here for the runtime's modules."""

from quant.config import ModelConfig as ModelConfig
