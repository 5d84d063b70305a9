"""The one vocabulary for what a graph input, a graph output or a piece of state holds.

A value's role is a pair ``(Role, name)``: ``(Role.ANCHOR, "fc.weight")``,
``(Role.BATCH, 0)``, ``(Role.LR, None)``. Capture tags every placeholder and
output with its role (``node.meta[ROLE]`` and the output node's
``meta[OUTPUT_ROLES]``), passes find nodes and add inputs by role, and the
runtime keeps its state as ``state[role][name]``, so the input list of a
compiled program is a list of roles fixed when it is compiled.
"""
import enum

ROLE = "halp_role"
OUTPUT_ROLES = "halp_output_roles"


class Role(str, enum.Enum):
    # inputs of the captured gradient graph
    PARAM = "param"            # a trainable parameter (float32)
    FROZEN = "frozen"          # a parameter with requires_grad=False: read, never updated
    BUFFER = "buffer"          # a module buffer (BatchNorm running statistics); also an output, updated
    BATCH = "batch"            # the i-th tensor of a batch
    # outputs of the captured gradient graph
    LOSS = "loss"
    GRAD = "grad"              # the gradient of the loss with respect to a PARAM
    # HALP state and inputs the passes add
    ANCHOR = "anchor"          # float32 A
    OFFSET = "offset"          # integer Z (float32 for bits=None)
    SCALE = "scale"            # float32 scalar d
    FULL_GRAD = "full_grad"    # float32 G, the mean gradient at the anchor over the data set
    MOMENTUM = "momentum"      # float32 velocity, with momentum > 0
    LR = "lr"                  # 0-d float32 learning rate
    ROUNDING_KEYS = "rounding_keys"  # int32 key per tensor for stochastic rounding
    ANCHOR_CONSTANT = "anchor_constant"  # a value of the step computed from the anchors alone (an anchor weight
                                         # quantized or cast to bf16), computed once per recenter, named by its node
    # nodes and outputs the passes add
    WEIGHT = "weight"          # W = A + d * Z, computed in the step
    CORRECTED_GRAD = "corrected_grad"  # u = g(W) - g(A) + G
    UPDATE = "update"          # offset_update's (new offset, direction, offset before rounding, underflow)
    UNDERFLOW = "underflow"    # 0-d float32: the sum over the steps since the last recenter of the fraction of
                               # a tensor's entries whose step was below half a grid step (mu="auto" reads it)
    ALL_FINITE = "all_finite"  # the guard's flag

    def __repr__(self):
        return repr(self.value)

    __str__ = __repr__


# The state a successful step replaces with its outputs of the same role.
COMMITTED = (Role.OFFSET, Role.MOMENTUM, Role.BUFFER, Role.UNDERFLOW)
# The state a HALP step keeps per trainable tensor, in state_dict order.
PER_TENSOR_STATE = (Role.ANCHOR, Role.OFFSET, Role.SCALE, Role.FULL_GRAD, Role.MOMENTUM)


def role_of(node):
    """The ``(Role, name)`` a node carries, or ``(None, None)``."""
    return node.meta.get(ROLE, (None, None))
